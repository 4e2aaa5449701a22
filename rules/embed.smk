# Per embed job (a group of chunks, `model.tiles_per_job` tiles): fetch its imagery into the tile cache (remote
# sources only), then embed its tiles in one process (the GPU jobs on a cluster). Both go chunk by chunk and keep
# the chunks an interrupted run finished.


rule fetch:
    input:
        plan=PLAN,
    output:
        report=f"{BUILD}/imagery/{{job}}.json",
    params:
        settings=SETTINGS,
        digest=digest("fetch"),
        records_dir=f"{BUILD}/imagery/chunks",
    log:
        f"{LOGS}/fetch/{{job}}.log",
    shell:
        "{STEP} fetch --settings {params.settings:q} --plan {input.plan:q} --job {wildcards.job}"
        " --records-dir {params.records_dir:q} --out {output.report:q} > {log:q} 2>&1"


rule embed:
    input:
        plan=PLAN,
        model=rules.model.output.record,
        imagery=rules.fetch.output.report if PLANNED.imagery.fetches_ahead else [],
    output:
        record=f"{BUILD}/embedded/{{job}}.json",
    params:
        settings=SETTINGS,
        digest=digest("embed"),
        chunks_dir=f"{BUILD}/chunks",
    threads: 2
    resources:
        # profiles/local runs one embed job at a time on a GPU (each takes the whole card: batch_size auto), one
        # on each GPU with --resources gpu=N (each job claims its own: common.gpu_claim); profiles/slurm gives
        # each its own.
        gpu=CFG.model.embed_gpus,
    log:
        f"{LOGS}/embed/{{job}}.log",
    shell:
        "{STEP} embed --settings {params.settings:q} --plan {input.plan:q} --model {input.model:q}"
        " --job {wildcards.job} --threads {threads} --chunks-dir {params.chunks_dir:q} --out {output.record:q}"
        " > {log:q} 2>&1"
