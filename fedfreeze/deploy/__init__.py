"""Starting federations as processes: SuperLink, SuperNodes and runs (``launch``), and local simulations (``simulate``)."""
