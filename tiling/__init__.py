"""The tiling stage: tissue detection, the patch grid and QC pictures (installed as ``ips_path.tiling``)."""
