"""How peers talk: message schemas, the tensor codec, RPC names and stubs, guarded streams."""
