from trig_stream.cli import main

raise SystemExit(main())
