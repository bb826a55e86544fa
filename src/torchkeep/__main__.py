from torchkeep.cli import main

raise SystemExit(main())
