from zmqchat.cli import main

main()
