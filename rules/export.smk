# What GIS users open: one COG per query plus the concept map (each with a QGIS style), the answers a planner acts
# on (percentile COGs, the dominant-query COG, the top places as GeoPackage and CSV), and an HTML preview.


rule cogs:
    input:
        store=rules.mosaic.output.store,
    output:
        queries=expand(f"{COGS}/{{query}}.tif", query=QUERY_IDS),
        concepts=f"{COGS}/concepts.tif",
    params:
        settings=SETTINGS,
        digest=digest("cogs"),
        store=STORE,
        cog_dir=COGS,
    log:
        f"{LOGS}/cogs.log",
    shell:
        "{STEP} cogs --settings {params.settings:q} --store {params.store:q} --out-dir {params.cog_dir:q} > {log:q} 2>&1"


rule percentiles:
    input:
        store=rules.mosaic.output.store,
    output:
        percentiles=expand(f"{COGS}/{{query}}_percentile.tif", query=QUERY_IDS),
    params:
        settings=SETTINGS,
        digest=digest("percentiles"),
        store=STORE,
        cog_dir=COGS,
    log:
        f"{LOGS}/percentiles.log",
    shell:
        "{STEP} percentiles --settings {params.settings:q} --store {params.store:q} --out-dir {params.cog_dir:q}"
        " > {log:q} 2>&1"


rule dominant:
    input:
        store=rules.mosaic.output.store,
    output:
        dominant=f"{COGS}/dominant.tif",
    params:
        settings=SETTINGS,
        digest=digest("dominant"),
        store=STORE,
        cog_dir=COGS,
    log:
        f"{LOGS}/dominant.log",
    shell:
        "{STEP} dominant --settings {params.settings:q} --store {params.store:q} --out-dir {params.cog_dir:q}"
        " > {log:q} 2>&1"


rule top_places:
    input:
        store=rules.mosaic.output.store,
    output:
        gpkg=f"{BUILD}/top_places.gpkg",
        csv=f"{BUILD}/top_places.csv",
    params:
        settings=SETTINGS,
        digest=digest("places"),
        store=STORE,
    log:
        f"{LOGS}/top_places.log",
    shell:
        "{STEP} places --settings {params.settings:q} --store {params.store:q} --gpkg {output.gpkg:q}"
        " --csv {output.csv:q} > {log:q} 2>&1"


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
