# The demo model, built from data shipped in examples/ (see examples/training/README.md):
#     snakemake --profile profiles/local demo_model     (the data set, then the model; demo_dataset alone)
# Not part of a map build: `all` does not ask for it.

import os
import shlex
import sys

DEMO = f"{CFG.output_dir}/demo-model"
DEMO_DATA = f"{shlex.quote(sys.executable)} -m pipeline.demo_data"
MODEL_CLI = f"{shlex.quote(sys.executable)} -m model"
DEMO_TARGETS = {"demo_dataset", "demo_model"}


def shipped_demo_inputs(wildcards):
    """The files the demo data set is made from; imported only when a run asks for it (it loads torch)."""
    from pipeline.demo_data import shipped_inputs

    return shipped_inputs()


# Views of real Landsat 8 scenes paired with real CC0 recordings by land cover, in the plain folder layout; their
# centres anywhere over each scene, so that views reach past its edge as the map's tiles do.
rule demo_dataset:
    input:
        shipped_demo_inputs,
    output:
        folder=directory(f"{DEMO}/dataset"),
    log:
        f"{DEMO}/logs/dataset.log",
    shell:
        "{DEMO_DATA} {output.folder:q} --past-edge > {log:q} 2>&1"


# The demo model trained from scratch on that data set (config/demo_train.yaml); the run folder keeps its
# checkpoints and TensorBoard/CSV logs. The weights are then copied over the default build's model
# (model/weights/demo.*), which maps rebuild from. Those files are not declared outputs: as outputs they would
# make every map build depend on this rule, and retrain a missing data set before mapping.
rule demo_model:
    input:
        folder=rules.demo_dataset.output.folder,
        settings=os.path.join(workflow.basedir, "config", "demo_train.yaml"),
    output:
        run=directory(f"{DEMO}/run"),
    params:
        weights=os.path.join(workflow.basedir, "model", "weights", "demo"),
    log:
        f"{DEMO}/logs/train.log",
    shell:
        "({MODEL_CLI} train --config {input.settings:q} --out-dir {output.run:q} --data-root {input.folder:q}"
        " && cp {output.run:q}/model.safetensors {params.weights:q}.safetensors"
        " && cp {output.run:q}/model.json {params.weights:q}.json) > {log:q} 2>&1"
