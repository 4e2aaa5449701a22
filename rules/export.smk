# What GIS users open: one COG per query plus the concept map (each with a QGIS style), and an HTML preview.


rule cogs:
    input:
        store=rules.mosaic.output.store,
    output:
        queries=expand(f"{BUILD}/cog/{{query}}.tif", query=QUERY_IDS),
        concepts=f"{BUILD}/cog/concepts.tif",
    params:
        settings=SETTINGS,
        digest=digest("cogs"),
        store=STORE,
        cog_dir=f"{BUILD}/cog",
    log:
        f"{LOGS}/cogs.log",
    shell:
        "{STEP} cogs --settings {params.settings:q} --store {params.store:q} --out-dir {params.cog_dir:q} > {log:q} 2>&1"


rule preview:
    input:
        store=rules.mosaic.output.store,
        plan=PLAN,
    output:
        html=f"{BUILD}/preview.html",
    params:
        settings=SETTINGS,
        store=STORE,
    log:
        f"{LOGS}/preview.log",
    shell:
        "{STEP} preview --settings {params.settings:q} --store {params.store:q} --plan {input.plan:q}"
        " --out {output.html:q} > {log:q} 2>&1"
