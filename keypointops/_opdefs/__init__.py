"""What an op's compiled entry (``keypointops.ops``) and its Triton kernels (``keypointops.triton``)
share: backend choice, argument checks, fake kernels and autograd formulas.  Both import from here;
nothing here imports either of them, so the dependency points one way."""
