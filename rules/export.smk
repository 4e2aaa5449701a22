# What GIS users open: one COG per query plus the concept map (each with a QGIS style), the answers a planner acts
# on (percentile COGs, the dominant-query COG, the top places as GeoPackage and CSV), the build's imagery at preview
# resolution, an HTML preview and a QGIS project of them all; with outputs.zones, every query's statistics per zone.


rule cogs:
    input:
        store=rules.mosaic.output.store,
    output:
        queries=expand(f"{COGS}/{{query}}.tif", query=QUERY_IDS),
        concepts=f"{COGS}/concepts.tif",
        percentiles=expand(f"{COGS}/{{query}}_percentile.tif", query=QUERY_IDS),
        dominant=f"{COGS}/dominant.tif",
    params:
        settings=SETTINGS,
        digest=digest("cogs"),
        store=STORE,
        cog_dir=COGS,
    log:
        f"{LOGS}/cogs.log",
    shell:
        "{STEP} cogs --settings {params.settings:q} --store {params.store:q} --out-dir {params.cog_dir:q} > {log:q} 2>&1"


rule top_places:
    input:
        store=rules.mosaic.output.store,
    output:
        gpkg=f"{BUILD}/top_places.gpkg",
        csv=f"{BUILD}/top_places.csv",
    # The preview waits for the places: they go first among the exports.
    priority: 1
    params:
        settings=SETTINGS,
        digest=digest("places"),
        store=STORE,
    log:
        f"{LOGS}/top_places.log",
    shell:
        "{STEP} places --settings {params.settings:q} --store {params.store:q} --gpkg {output.gpkg:q}"
        " --csv {output.csv:q} > {log:q} 2>&1"


if ZONES:

    rule zones:
        input:
            store=rules.mosaic.output.store,
            zones=ZONES,
        output:
            gpkg=ZONE_TABLES["gpkg"],
            csv=ZONE_TABLES["csv"],
        params:
            settings=SETTINGS,
            digest=digest("zones"),
            store=STORE,
        log:
            f"{LOGS}/zones.log",
        shell:
            "{STEP} zones --settings {params.settings:q} --store {params.store:q} --gpkg {output.gpkg:q}"
            " --csv {output.csv:q} > {log:q} 2>&1"


rule underlay:
    input:
        plan=PLAN,
    output:
        imagery=f"{BUILD}/imagery.tif",
    params:
        settings=SETTINGS,
        digest=digest("underlay"),
    log:
        f"{LOGS}/underlay.log",
    shell:
        "{STEP} underlay --settings {params.settings:q} --plan {input.plan:q} --out {output.imagery:q} > {log:q} 2>&1"


rule preview:
    input:
        store=rules.mosaic.output.store,
        plan=PLAN,
        underlay=rules.underlay.output.imagery,
        places=rules.top_places.output.gpkg,
    output:
        html=f"{BUILD}/{PREVIEW_NAME}",
    params:
        settings=SETTINGS,
        store=STORE,
    log:
        f"{LOGS}/preview.log",
    shell:
        "{STEP} preview --settings {params.settings:q} --store {params.store:q} --plan {input.plan:q}"
        " --underlay {input.underlay:q} --places {input.places:q} --out {output.html:q} > {log:q} 2>&1"


rule project:
    input:
        rules.cogs.output,
        store=rules.mosaic.output.store,
        places=rules.top_places.output.gpkg,
        underlay=rules.underlay.output.imagery,
        zones=ZONE_TABLES.get("gpkg", []),
    output:
        qgz=f"{BUILD}/{PROJECT_NAME}",
    params:
        settings=SETTINGS,
        digest=digest("project"),
        store=STORE,
        cog_dir=COGS,
        zones=f"--zones {shlex.quote(ZONE_TABLES['gpkg'])}" if ZONES else "",
    log:
        f"{LOGS}/project.log",
    shell:
        "{STEP} project --settings {params.settings:q} --store {params.store:q} --cog-dir {params.cog_dir:q}"
        " --places {input.places:q} --underlay {input.underlay:q} {params.zones} --out {output.qgz:q} > {log:q} 2>&1"
