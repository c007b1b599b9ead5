from dynamiclrp.cli import main

raise SystemExit(main())
