# Per chunk: fetch its imagery into the tile cache (remote sources only). Per embed job (a group of chunks,
# `model.tiles_per_job` tiles): embed their tiles in one process (the GPU jobs on a cluster).


rule fetch:
    input:
        plan=PLAN,
    output:
        report=f"{BUILD}/imagery/{{chunk}}.json",
    params:
        settings=SETTINGS,
        digest=digest("fetch"),
    log:
        f"{LOGS}/fetch/{{chunk}}.log",
    shell:
        "{STEP} fetch --settings {params.settings:q} --plan {input.plan:q} --chunk {wildcards.chunk}"
        " --out {output.report:q} > {log:q} 2>&1"


rule embed:
    input:
        plan=PLAN,
        model=rules.model.output.record,
        imagery=lambda wildcards: (
            [f"{BUILD}/imagery/{chunk}.json" for chunk in JOBS[int(wildcards.job)]]
            if PLANNED.imagery.fetches_ahead
            else []
        ),
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
