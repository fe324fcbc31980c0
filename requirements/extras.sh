# Sourced by scripts/setup.sh: optional integrations and benchmark peers, each installed without
# letting pip touch torch. A failure here only disables that integration/peer (it reports why).
"$VPY" -c "import diffusers" 2>/dev/null || pip_install --no-build-isolation diffusers==0.42.1 || echo "setup: diffusers not installed (nuwa.integrations.diffusers unavailable)"
