"""Adapting a trained model to a new site without sharing its data (``fedfreeze adapt``).

* ``batchnorm``: re-estimate every BatchNorm layer's running statistics on the site's images (AdaBN);
* ``prevalence``: the site's class prevalence from the model's scores alone (EM, Saerens et al. 2002);
* ``recalibration``: temperature or Platt scaling and a threshold chosen on a few labelled cases,
  with patient-level bootstrap intervals;
* ``adapt``: reads a model folder and the site's data, runs the steps, writes a new model folder
  whose card records what was adapted and from what.
"""
