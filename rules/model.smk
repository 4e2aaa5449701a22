# The model's weights, recorded once for every job (the plan is made when the workflow starts).


rule model:
    input:
    output:
        record=MODEL,
    params:
        settings=SETTINGS,
        digest=digest("model"),
    log:
        f"{LOGS}/model.log",
    shell:
        "{STEP} model --settings {params.settings:q} --out {output.record:q} > {log:q} 2>&1"
