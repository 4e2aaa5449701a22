# The region-wide Zarr store, assembled block by block from every chunk's embeddings and scores.
# The store is a folder that the step renames into place when complete; its consolidated metadata file
# stands for it (a directory() output would get Snakemake's timestamp file inside the store).


rule mosaic:
    input:
        plan=rules.plan.output.plan,
        model=rules.model.output.record,
        queries=rules.queries.output.queries,
        chunks=expand(rules.embed.output.chunk, chunk=CHUNKS),
        scores=rules.score.output.scores,
    output:
        store=f"{STORE}/.zmetadata",
    params:
        settings=step_settings_of("mosaic"),
    threads: 2
    log:
        f"{LOGS}/mosaic.log",
    shell:
        "{STEP} mosaic --plan {input.plan} --model {input.model} --queries {input.queries}"
        " --chunks-dir {BUILD}/chunks --scores-dir {BUILD}/scores --threads {threads}"
        " --settings {params.settings:q} --out {STORE} > {log} 2>&1"
