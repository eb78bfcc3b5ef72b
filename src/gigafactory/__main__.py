from gigafactory.cli import main

main()
