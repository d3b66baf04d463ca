"""What ``fedfreeze simulate`` and ``run`` print when a federation ends: the exported model's figures."""

from __future__ import annotations

from pathlib import Path


def print_federation(metrics: dict, out: Path) -> None:
    """The pooled figures of the exported model; every line names the threshold it was computed at
    (AUROC takes none; a multi-class decision is the arg-max), and an estimate from cells is shown to
    the decimals its range supports."""
    from fedfreeze.federation.estimates import decimals_for
    from fedfreeze.federation.report import rounds_done

    exported = metrics.get("exported") or {}
    final = exported.get("pooled") or (metrics.get("final") or {}).get("pooled") or {}
    at = final.get("at_threshold_next") or final.get("at_threshold_used") or {}
    mean = (metrics.get("final") or {}).get("weighted_mean") or {}
    print(
        f"\nfederation {metrics['status']}: {rounds_done(metrics)}, "
        f"uplink {metrics['totals']['bytes_up'] / 1e6:.2f} MB in all, {metrics['totals']['seconds']:.0f} s"
    )
    which = (
        f"the global model after round {exported['round']} ({exported['rule']})"
        if exported
        else "the final global model"
    )
    if at and "threshold" not in at:  # multi-class: pooled confusion matrices, arg-max decisions
        print(f"pooled validation metrics of {which}, n={at['n']}:")
        for key in ("accuracy", "balanced_accuracy", "f1"):
            print(f"  {key:<18} {at[key]:.4f}  (arg-max class, no threshold)")
    elif at:
        rule = str(metrics.get("threshold_rule"))
        if _is_number(rule):  # federation.threshold = a number: set by the config, not fitted to these data
            how = f"its stored threshold {at['threshold']:.3f} is the config's (federation.threshold = {rule})"
        else:
            interval = exported.get("threshold_interval")
            spread = f", bootstrap 95% interval {interval[0]:.3f}-{interval[1]:.3f}" if interval else ""
            how = (
                f"its stored threshold {at['threshold']:.3f} was chosen ({rule}{spread}) on these same "
                "validation data, so the figures at it are optimistic"
            )
        print(f"pooled validation metrics of {which}, n={at['n']}; {how}:")
        cells = final.get("cells") or {}
        # what the sites' cells fix exactly (federation.min-cell-count); exact counts (a secure sum) need none
        ranges = at.get("ranges") or {} if cells.get("min_cell_count", 1) > 1 else {}
        for key in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity"):
            where = "(over all thresholds)" if key == "auroc" else f"at threshold {at['threshold']:.3f}"
            span = f"  [cells allow {ranges[key][0]:.3f}-{ranges[key][1]:.3f}]" if key in ranges else ""
            digits = decimals_for(ranges[key][1] - ranges[key][0] if key in ranges else None)
            print(f"  {key:<18} {at[key]:.{digits}f}  {where}{span}")
        if cells.get("min_cell_count", 1) > 1:
            print(
                f"  (estimated from the sites' cells of at least {cells['min_cell_count']} validation cases each, "
                "federation.min-cell-count: the exact figures lie in the bracketed ranges)"
            )
        elif "secure_sum" in cells:
            print(
                f"  (exact: the coordinator learnt only the sum of the {len(cells['secure_sum']['sites'])} training "
                "sites' validation histograms, federation.secure-aggregation)"
            )
    if "auroc" in mean:
        source = mean.get("from", "")
        print(
            f"  (weighted mean of the sites' own AUROCs{f' ({source})' if source else ''}, over all thresholds, "
            f"what other frameworks report: {mean['auroc']:.{2 if 'cells' in source else 4}f})"
        )
    evaluators = (metrics.get("final") or {}).get("evaluation_sites") or {}
    ext = evaluators.get("at_threshold_next") or evaluators.get("at_threshold_used")
    if ext and "auroc" in ext:
        check = metrics.get("held_out_check") or {}
        held = (
            f"held out: {check['how']}"
            if check.get("checked")
            else "not checked to be held out from the training sites' data"
        )
        print(
            f"evaluation-only sites ({', '.join(evaluators['sites'])}; {held}), the final global model, n={ext['n']}:"
        )
        about = evaluators.get("cells") or {}
        spans = ext.get("ranges") or {} if about.get("min_cell_count", 1) > 1 else {}
        for key in ("auroc", "balanced_accuracy", "sensitivity", "specificity"):
            where = "(over all thresholds)" if key == "auroc" else f"at threshold {ext['threshold']:.3f}"
            span = f"  [cells allow {spans[key][0]:.3f}-{spans[key][1]:.3f}]" if key in spans else ""
            digits = decimals_for(spans[key][1] - spans[key][0] if key in spans else None)
            print(f"  {key:<18} {ext[key]:.{digits}f}  {where}{span}")
    if at and "threshold" in at:
        shared = exported.get("operating_points") or []
        print(
            f"threshold in use: the global {at['threshold']:.3f} at every site without its own (not validated there); "
            + (
                f"site operating points in the model folder: {', '.join(shared)} (evaluate --site NAME)"
                if shared
                else "no site shared its operating point (each keeps its own in its state folder)"
            )
        )
    print(f"report:  {out / 'metrics.json'}, {out / 'rounds.csv'}, {out / 'rounds.png'}")
    print(
        f"model:   {metrics['model']}  (score new data with: fedfreeze evaluate --model {metrics['model']} --data ...)"
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
