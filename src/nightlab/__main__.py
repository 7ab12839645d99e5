from nightlab.cli.main import main

main()
