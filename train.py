"""Fine-tune a model with a mixture-of-LoRA-experts method.

    python train.py configs/loramoe.yaml train.steps=200 data.path=my_data.jsonl

The same as `jaxmoelora train ...`; the work lives in jaxmoelora.training.
"""

import sys

from jaxmoelora.cli import main
from jaxmoelora.host_memory import restart_with_hugepage_malloc

if __name__ == "__main__":
    restart_with_hugepage_malloc()
    sys.exit(main(["train", *sys.argv[1:]]))
