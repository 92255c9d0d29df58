from plateforme.cli import main

raise SystemExit(main())
