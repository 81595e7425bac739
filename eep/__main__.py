from eep.cli import main

raise SystemExit(main())
