# The queries' embeddings, and every chunk's raw cosine scores (redone when the queries change). Scoring
# is one matrix product per chunk, so one job does all chunks.


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


rule score:
    input:
        plan=PLAN,
        embedded=EMBEDDED,
        queries=rules.queries.output.queries,
    output:
        scores=expand(f"{BUILD}/scores/{{chunk}}.npz", chunk=CHUNKS),
    params:
        settings=SETTINGS,
        chunks_dir=f"{BUILD}/chunks",
        scores_dir=f"{BUILD}/scores",
    log:
        f"{LOGS}/score.log",
    shell:
        "{STEP} score --settings {params.settings:q} --plan {input.plan:q} --chunks-dir {params.chunks_dir:q}"
        " --queries {input.queries:q} --out-dir {params.scores_dir:q} > {log:q} 2>&1"
