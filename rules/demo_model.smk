# The demo model, built from data shipped in examples/ (see examples/training/README.md):
#     snakemake --profile profiles/local demo_dataset
# Not part of a map build: `all` does not ask for it.

import shlex
import sys

from pipeline.demo_data import shipped_inputs

DEMO = f"{CFG.output_dir}/demo-model"
DEMO_DATA = f"{shlex.quote(sys.executable)} -m pipeline.demo_data"
DEMO_TARGETS = {"demo_dataset"}


# Views of real Landsat 8 scenes paired with real CC0 recordings by land cover, in the plain folder layout.
rule demo_dataset:
    input:
        shipped_inputs(),
    output:
        folder=directory(f"{DEMO}/dataset"),
    log:
        f"{DEMO}/logs/dataset.log",
    shell:
        "{DEMO_DATA} {output.folder:q} > {log:q} 2>&1"
