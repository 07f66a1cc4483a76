"""What a results document says, as the few lines a command prints after its run.

Each reads a typed document (`sw_lens.documents`), so what a command prints is what the
file holds: ``python -m experiments.figures`` and a later reader see the same numbers.
"""

from collections import Counter

from sw_lens.documents import Circuit, Locate, Robustness, Search


def locate_summary(doc: Locate) -> str:
    lines = []
    model, scan = doc.model, doc.scan
    bos = "BOS prepended" if scan.prepend_bos else "no BOS prepended"
    lines.append(
        f"\n{model.name} ({model.architecture}, {model.n_layers} layers), "
        f"scan of {scan.n_tokens} tokens, {bos}"
    )
    if doc.execution and doc.execution.streamed:
        lines.append(f"streamed ({doc.execution.why}): {doc.execution.description}")
    if model.device_map:
        where = Counter(model.device_map.values())
        lines.append(
            "placed by a device map: "
            + ", ".join(f"{n} modules on {device}" for device, n in sorted(where.items()))
        )
    lines.append(
        f"{'layer':>5}  {'max |hook_post|':>15} {'ch':>5} {'token':<12} "
        f"{'max |hook_mlp_out|':>18} {'ch':>5} {'token':<12}"
    )
    for s in scan.layers:
        post, out = s.post, s.mlp_out
        flag = "  cancels" if s.cancels else ""
        lines.append(
            f"{s.layer:>5}  {abs(post.value):>15.2f} {post.channel:>5} "
            f"{post.token!r:<12} {abs(out.value):>18.2f} {out.channel:>5} "
            f"{out.token!r:<12}{flag}"
        )
    lines.append(f"\ncriterion: {doc.criterion.description}")
    lines.append(f"iterations: {doc.iterations} ({doc.termination})")
    for note in doc.notes:
        lines.append(f"  note: {note}")
    rank = doc.ranking
    lines.append(
        f"\ncandidates, ranked by perplexity when zeroed alone "
        f"({rank.corpus}, {rank.n_tokens} tokens, baseline {rank.perplexity:.3f}):"
    )
    if not doc.candidates:
        lines.append("  none: no layer met the criterion")
    for c in doc.candidates:
        verdict = "SUPER WEIGHT" if c.is_super else "no large effect"
        i, j = c.checkpoint_index
        lines.append(
            f"  layer {c.layer:>2} down_proj.weight[{c.row}, {c.col}] = {c.value:+.4f}"
            f"  (W_out[{c.layer}][{c.col}, {c.row}], {c.checkpoint_param}[{i}, {j}]; "
            f"iteration {c.iteration}, {c.role}, token {c.token!r})"
            f"  ppl x{c.effect:.3f}  {verdict}"
        )
    if doc.search:
        lines.append(search_summary(doc.search))
    ppl = doc.perplexity
    base = ppl.baseline
    lines.append(
        f"\nperplexity on {base.corpus}: {base.protocol_description}, "
        f"{base.n_tokens} tokens scored, {doc.provenance.dtype}"
    )
    lines.append(f"  {'baseline':<45} {base.perplexity:>10.3f}")
    for a in ppl.ablations:
        lines.append(f"  {a.label + ' zeroed':<45} {a.perplexity:>10.3f}  (x{a.ratio:.3f})")
    if doc.known:
        known = doc.known
        entry = known.entry or "no entry for this model"
        lines.append(f"\nknown coordinates ({entry}; registry convention {known.convention}):")
        for check in known.checks:
            lines.append(f"  {check.message}")
    if doc.predictions:
        pred = doc.predictions
        lines.append(f"\nnext token after {pred.prompt!r}, before -> after {pred.label} zeroed:")
        for b, a in zip(pred.before, pred.after, strict=True):
            lines.append(f"  {b.token!r:>14} {b.prob:6.1%}    {a.token!r:>14} {a.prob:6.1%}")
    return "\n".join(lines)


def search_summary(search: Search) -> str:
    lines = []
    p, rank = search.parameters, search.ranking
    lines.append(
        f"\nsearch: {search.n_measured} weights zeroed alone ({rank.n_tokens} tokens): "
        f"the top {p.search_k} by largest contribution and by saliency "
        f"({search.screen_overlap} in both), the rule's candidates, a walk down the "
        f"contribution ranking to rank {search.stop_rank} ({search.stop_reason}), and "
        f"{p.recall_sample} random weights beyond it (largest x{search.sample_max:.3f})"
    )
    for warning in search.warnings:
        lines.append(f"  WARNING: {warning}")
    lines.append(f"  {search.verdict}")
    for m in search.measured:
        if m.is_super:
            saliency = m.saliency_rank or "-"
            lines.append(
                f"  layer {m.layer:>2} down_proj.weight[{m.row}, {m.col}]  "
                f"x{m.confirmed_effect:.3f}  contribution rank {m.contribution_rank}, "
                f"saliency rank {saliency}; found by {', '.join(m.found_by)}"
            )
    for m in search.missed_by_screens:
        lines.append(
            f"  FINDING: layer {m.layer} [{m.row}, {m.col}] matters but neither screen "
            f"ranked it in its top {p.search_k} (found by {', '.join(m.found_by)})"
        )
    recall = search.rule_recall
    if recall.of:
        lines.append(f"  the spike rule alone finds {recall.found} of these {recall.of}")
    if search.ranking_noise is not None:
        lines.append(
            f"  ranking noise: a confirmed effect moved by up to "
            f"{search.ranking_noise:.1%} between the ranking and the reported budget"
        )
    return "\n".join(lines)


def robustness_summary(document: Robustness) -> str:
    lines = []
    lines.append(
        f"\n{document.model.name}: {document.n_texts} texts scanned one by one "
        f"({'BOS prepended' if document.prepend_bos else 'no BOS'})"
    )
    lines.append(
        f"{'weight (HF down_proj.weight)':<28} {'by rule':>10} {'top spike':>10} "
        f"{'median |w*post|':>15} {'max |w*post|':>12} {'max |row|':>10}  "
        f"fires on (where named)     flags"
    )
    for r in document.weights:
        kinds = ", ".join(f"{k} {n}" for k, n in r.kinds.items() if n) or "-"
        n, weight = r.n_texts, f"layer {r.layer} [{r.row}, {r.col}]"
        lines.append(
            f"{weight:<28} "
            f"{r.n_rule:>4}/{n:<5} {r.n_top:>4}/{n:<5} {r.median_contribution:>15.4g} "
            f"{r.max_contribution:>12.4g} {r.max_activation:>10.4g}  {kinds:<26} "
            f"{'; '.join(r.flags)}"
        )
    if not document.weights:
        lines.append("  no weight met the criterion on any text")
    return "\n".join(lines)


def circuit_summary(document: Circuit, shown: int = 5) -> str:
    """What the circuit document says, in a few lines."""
    exact, attribution = document.patching.exact, document.patching.attribution
    increase = exact.zeroed_nll - exact.clean_nll
    lines = [
        f"loss on {exact.n_tokens} corpus tokens ({exact.protocol_description}): "
        f"{exact.clean_nll:.4f} nats clean, {exact.zeroed_nll:.4f} zeroed "
        f"({increase:+.4f})"
    ]
    for where in ("prompt", "corpus"):
        sinks = getattr(document.sinks, where)
        pairs = [
            (c - z, layer, head, c, z)
            for layer, (cs, zs) in enumerate(zip(sinks.clean, sinks.zeroed, strict=True))
            for head, (c, z) in enumerate(zip(cs, zs, strict=True))
        ]
        top = sorted(pairs, key=lambda p: -abs(p[0]))[:shown]
        heads = ", ".join(f"L{layer} H{head} {c:.2f}->{z:.2f}" for _, layer, head, c, z in top)
        lines.append(f"attention on the sink token ({where}, clean->zeroed): {heads}")
    rows = [r for r in document.patching.components if r.recovered is not None]
    rows.sort(key=lambda r: -r.recovered)
    lines.append("components that recover the most when restored (exact; reproduced when")
    lines.append("  patched into the clean run; attribution's estimate):")
    lines += [
        f"  {r.label:<10} recovers {r.recovered:+7.1%}  reproduces {r.reproduced:+7.1%}"
        f"  estimated {r.estimated:+7.1%}"
        for r in rows[:shown]
    ]
    a = document.agreement
    spearman = "n/a" if a.spearman is None else f"{a.spearman:.3f}"
    lines.append(
        f"attribution vs exact over {a.n_components} components: Spearman {spearman}, "
        f"top-{a.k} overlap {a.top_k_overlap}/{a.k}, exact's top component is "
        f"attribution's #{a.attribution_rank_of_exact_top}"
    )
    story = document.residual
    present = story.present_layers
    lines.append(
        f"residual stream at {story.token!r} (position {story.position}), channel "
        f"{story.row}: peak {story.channel_clean[story.peak_layer]:.4g} after layer "
        f"{story.peak_layer}; >= half the peak after layers "
        f"{present[0]}-{present[-1]}; cancelled by layers {story.cancelling_layers or 'none'}; "
        f"logit lens at the last layer {story.lens_clean[-1]!r} -> {story.lens_zeroed[-1]!r}"
    )
    lines.append(
        f"cost in single-pass equivalents: attribution {attribution.passes:.2f}, "
        f"exact patching {exact.passes:.1f}"
    )
    return "\n".join(lines)
