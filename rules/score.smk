# The queries' embeddings, and every chunk's raw cosine scores (redone when the queries change). Scoring
# is one matrix product per chunk, so one job does all chunks.


rule queries:
    input:
        model=rules.model.output.record,
    output:
        queries=QUERIES,
    params:
        settings=step_settings_of("queries"),
    log:
        f"{LOGS}/queries.log",
    shell:
        "{STEP} queries --model {input.model} --settings {params.settings:q} --runtime {RUNTIME:q}"
        " --out {output.queries} > {log} 2>&1"


rule score:
    input:
        plan=rules.plan.output.plan,
        chunks=expand(rules.embed.output.chunk, chunk=CHUNKS),
        queries=rules.queries.output.queries,
    output:
        scores=expand(f"{BUILD}/scores/{{chunk}}.npz", chunk=CHUNKS),
    log:
        f"{LOGS}/score.log",
    shell:
        "{STEP} score --plan {input.plan} --chunks-dir {BUILD}/chunks --queries {input.queries}"
        " --out-dir {BUILD}/scores > {log} 2>&1"
