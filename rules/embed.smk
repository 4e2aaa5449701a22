# Per chunk: fetch its imagery into the tile cache (remote sources only), then embed its tiles (the GPU
# jobs on a cluster).


rule fetch:
    input:
        plan=rules.plan.output.plan,
    output:
        report=f"{BUILD}/imagery/{{chunk}}.json",
    params:
        settings=step_settings_of("fetch"),
    log:
        f"{LOGS}/fetch/{{chunk}}.log",
    shell:
        "{STEP} fetch --plan {input.plan} --chunk {wildcards.chunk} --settings {params.settings:q}"
        " --runtime {RUNTIME:q} --out {output.report} > {log} 2>&1"


rule embed:
    input:
        plan=rules.plan.output.plan,
        model=rules.model.output.record,
        imagery=[rules.fetch.output.report] if fetches_ahead(CFG.imagery.source) else [],
    output:
        chunk=f"{BUILD}/chunks/{{chunk}}.npz",
    params:
        settings=step_settings_of("embed"),
    threads: 2
    log:
        f"{LOGS}/embed/{{chunk}}.log",
    shell:
        "{STEP} embed --plan {input.plan} --model {input.model} --chunk {wildcards.chunk} --threads {threads}"
        " --settings {params.settings:q} --runtime {RUNTIME:q} --out {output.chunk} > {log} 2>&1"
