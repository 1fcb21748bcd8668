from pi_policy.tools.cli import main

raise SystemExit(main())
