"""Console scripts: ``dplh-train``, ``dplh-sweep``, ``dplh-audit``,
``dplh-baseline``, ``dplh-plot``, ``dplh-analyze``, ``dplh-evaluate``,
``dplh-export``. Each is a thin absl main over a library function."""
