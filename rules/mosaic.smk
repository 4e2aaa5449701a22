# The region-wide Zarr store, assembled block by block from every chunk's embeddings and scores.
# The store is a folder that the step renames into place when complete; its consolidated metadata file
# stands for it (a directory() output would get Snakemake's timestamp file inside the store).


rule mosaic:
    input:
        plan=PLAN,
        model=rules.model.output.record,
        queries=rules.queries.output.queries,
        embedded=EMBEDDED,
        scores=rules.score.output.record,
        gallery=GALLERY_RECORD,
    output:
        store=f"{STORE}/{STORE_MARKER}",
    params:
        settings=SETTINGS,
        digest=digest("mosaic"),
        chunks_dir=f"{BUILD}/chunks",
        scores_dir=f"{BUILD}/scores",
        store=STORE,
        gallery=GALLERY_OPTION,
    threads: 2
    log:
        f"{LOGS}/mosaic.log",
    shell:
        "{STEP} mosaic --settings {params.settings:q} --plan {input.plan:q} --model {input.model:q}"
        " --queries {input.queries:q} --chunks-dir {params.chunks_dir:q} --scores-dir {params.scores_dir:q}"
        "{params.gallery} --threads {threads} --out {params.store:q} > {log:q} 2>&1"
