"""molink-swarm: run large language models over a peer-to-peer swarm of volunteers' GPUs and CPUs."""

__version__ = "0.1.0"

__all__ = ["AutoDistributedModelForCausalLM", "__version__"]


def __getattr__(name: str):
    # The client pulls in torch and transformers; keep `import molink_swarm` (and the CLI's --help) light.
    if name == "AutoDistributedModelForCausalLM":
        from molink_swarm.client.model import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM
    raise AttributeError(name)
