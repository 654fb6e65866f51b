import sys

from diffusion_po.cli import main

sys.exit(main())
