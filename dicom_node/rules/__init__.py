"""Rules: which models run on a complete series, and why the other rules do not apply.

- :mod:`dicom_node.rules.keys`: the grammar of a ``when`` key (imports nothing of the node,
  so the settings can validate keys with it);
- :mod:`dicom_node.rules.summary`: a series' headers as a :class:`~dicom_node.domain.SeriesSummary`;
- :mod:`dicom_node.rules.matcher`: pure matching of summaries against
  :class:`dicom_node.settings.RuleSettings`, with explanations;
- :mod:`dicom_node.rules.replay`: re-evaluating rules over series already received.
"""
