"""Sat2Sound soundscape map of a region: imagery -> tile embeddings -> query scores -> Zarr -> COGs + preview.

    snakemake --profile profiles/local                        # the default build (config/config.yaml)
    snakemake --profile profiles/local --configfile my.yaml   # any other build
    snakemake --profile profiles/slurm                        # on a SLURM cluster, one GPU per embed job

Everything a build writes lands in <output_dir>/<name>/ (see README, "Building a map").
"""

import os
import sys

from snakemake.utils import min_version

min_version("8.20")


if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/embed.smk"
include: "rules/score.smk"
include: "rules/mosaic.smk"
include: "rules/export.smk"
include: "rules/demo_model.smk"


# Jobs that download (checkpoint, imagery and its preview underlay, text backbone) or are tiny run where snakemake
# runs, not as cluster jobs: compute nodes often have no internet, and the tile and model caches are shared.
localrules:
    all,
    model,
    fetch,
    queries,
    underlay,


rule all:
    input:
        rules.mosaic.output.store,
        rules.cogs.output,
        rules.top_places.output,
        list(ZONE_TABLES.values()),
        rules.preview.output.html,
        rules.project.output.qgz,


onsuccess:
    from pipeline.build import finish_lines

    # A run asked only for the demo model's targets made no map.
    targets = set(workflow.dag_settings.targets)
    if not targets or targets - DEMO_TARGETS:
        print("\n".join(finish_lines(BUILD, STORE, zones=bool(ZONES))), file=sys.stderr)
