from gvm_mega.cli import main

raise SystemExit(main())
