from molink_swarm.cli import main

main()
