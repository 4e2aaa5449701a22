# The model's weights, recorded once for every job (the plan is made when the workflow starts).


rule model:
    input:
        # A local checkpoint is an input, so weights retrained in place (the demo_model target) rebuild the maps.
        local_checkpoint(CFG.model),
    output:
        record=MODEL,
    params:
        settings=SETTINGS,
        digest=digest("model"),
    log:
        f"{LOGS}/model.log",
    shell:
        "{STEP} model --settings {params.settings:q} --out {output.record:q} > {log:q} 2>&1"
