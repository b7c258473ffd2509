"""`python -m hybridllm ...` is the `hybridllm` command."""
import sys

from hybridllm.cli import main

sys.exit(main())
