# The queries' embeddings, and every chunk's raw cosine scores (redone when the queries change). Scoring is one
# matrix product per chunk, so one job does all chunks (scores/<chunk>.npz, then scored.json); with a sound
# gallery, it also finds each tile's best gallery recordings (redone when the gallery changes, without embedding
# the tiles again).


rule queries:
    input:
        model=rules.model.output.record,
    output:
        queries=QUERIES,
    params:
        settings=SETTINGS,
        digest=digest("queries"),
    log:
        f"{LOGS}/queries.log",
    shell:
        "{STEP} queries --settings {params.settings:q} --model {input.model:q} --out {output.queries:q} > {log:q} 2>&1"


if GALLERY is not None and GALLERY.recordings is not None:

    rule gallery:
        input:
            model=rules.model.output.record,
            recordings=GALLERY.recording_files(),
        output:
            record=GALLERY_RECORD,
        params:
            settings=SETTINGS,
            digest=digest("gallery"),
            recordings=str(GALLERY.recordings),
            folder=str(GALLERY.folder),
        log:
            f"{LOGS}/gallery.log",
        shell:
            "{STEP} gallery --settings {params.settings:q} --model {input.model:q}"
            " --recordings {params.recordings:q} --out {params.folder:q} > {log:q} 2>&1"


rule score:
    input:
        plan=PLAN,
        embedded=EMBEDDED,
        queries=rules.queries.output.queries,
        gallery=GALLERY_RECORD,
    output:
        # One record: listing every chunk's score file as an output makes Snakemake's DAG quadratic in chunks.
        record=f"{BUILD}/scored.json",
    params:
        settings=SETTINGS,
        digest=digest("score"),
        chunks_dir=f"{BUILD}/chunks",
        scores_dir=f"{BUILD}/scores",
        gallery=GALLERY_OPTION,
    log:
        f"{LOGS}/score.log",
    shell:
        "{STEP} score --settings {params.settings:q} --plan {input.plan:q} --chunks-dir {params.chunks_dir:q}"
        " --queries {input.queries:q}{params.gallery} --out-dir {params.scores_dir:q} --out {output.record:q}"
        " > {log:q} 2>&1"
