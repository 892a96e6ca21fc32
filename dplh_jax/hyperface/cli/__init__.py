"""Console scripts: ``dplh-train``, ``dplh-sweep``, ``dplh-audit``,
``dplh-baseline``. Each is a thin absl main over a library function."""
