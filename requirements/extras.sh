# Sourced by scripts/setup.sh: optional integrations and benchmark peers, each installed without
# letting pip touch torch. A failure here only disables that integration/peer (it reports why).
"$VPY" -c "import diffusers" 2>/dev/null || pip_install --no-build-isolation diffusers==0.42.1 || echo "setup: diffusers not installed (nuwa.integrations.diffusers unavailable)"
# nuwa-pytorch's Sparse3DNA (benchmark peer): --no-deps, since its metadata pulls torchvision.
"$VPY" -m pip show -q nuwa-pytorch >/dev/null 2>&1 || pip_install --no-deps nuwa-pytorch==0.7.8 unfoldNd==0.2.3 || echo "setup: nuwa-pytorch not installed (benchmark peer skipped)"
