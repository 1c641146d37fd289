from capsearch.cli import main

raise SystemExit(main())
