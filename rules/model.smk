# The model's weights (recorded once for every job) and the plan: tiles, chunks, imagery check.


rule model:
    output:
        record=MODEL,
    params:
        settings=step_settings_of("model"),
    log:
        f"{LOGS}/model.log",
    shell:
        "{STEP} model --settings {params.settings:q} --runtime {RUNTIME:q} --out {output.record} > {log} 2>&1"


rule plan:
    input:
        model=rules.model.output.record,
        region=[CFG.region] if Path(CFG.region).is_file() else [],
    output:
        plan=PLAN,
    params:
        settings=step_settings_of("plan"),
    log:
        f"{LOGS}/plan.log",
    shell:
        "{STEP} plan --model {input.model} --settings {params.settings:q} --runtime {RUNTIME:q}"
        " --out {output.plan} > {log} 2>&1"
