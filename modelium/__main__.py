from modelium.cli import main
import sys
sys.exit(main())
