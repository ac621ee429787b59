from custody_cli.main import main

raise SystemExit(main())
