# Per chunk: fetch its imagery into the tile cache (remote sources only), then embed its tiles (the GPU
# jobs on a cluster).


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
        imagery=[rules.fetch.output.report] if PLANNED.imagery.fetches_ahead else [],
    output:
        chunk=f"{BUILD}/chunks/{{chunk}}.npz",
    params:
        settings=SETTINGS,
        digest=digest("embed"),
    threads: 2
    log:
        f"{LOGS}/embed/{{chunk}}.log",
    shell:
        "{STEP} embed --settings {params.settings:q} --plan {input.plan:q} --model {input.model:q}"
        " --chunk {wildcards.chunk} --threads {threads} --out {output.chunk:q} > {log:q} 2>&1"
