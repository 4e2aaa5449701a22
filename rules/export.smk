# What GIS users open: one COG per query plus the concept map (each with a QGIS style), and an HTML preview.


rule cogs:
    input:
        store=rules.mosaic.output.store,
    output:
        queries=expand(f"{BUILD}/cog/{{query}}.tif", query=QUERY_IDS),
        concepts=f"{BUILD}/cog/concepts.tif",
    params:
        settings=step_settings_of("cogs"),
    log:
        f"{LOGS}/cogs.log",
    shell:
        "{STEP} cogs --store {STORE} --out-dir {BUILD}/cog --settings {params.settings:q} > {log} 2>&1"


rule preview:
    input:
        store=rules.mosaic.output.store,
        plan=rules.plan.output.plan,
    output:
        html=f"{BUILD}/preview.html",
    log:
        f"{LOGS}/preview.log",
    shell:
        "{STEP} preview --store {STORE} --plan {input.plan} --out {output.html} > {log} 2>&1"
