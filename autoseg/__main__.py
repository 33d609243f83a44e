from autoseg.cli import main

main()
