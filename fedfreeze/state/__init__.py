"""What the coordinator and a site keep in their state folders, free of Flower: the notes of the runs
(``runstate``), the registered sites (``sitebook``), the approved-apps list and the runner that
enforces it (``approval``; its check inside Flower's ClientApp is ``fedfreeze.flower.approval``), and
key fingerprints (``keys``). Launching (``deploy/``) writes them; the Flower adapters read them."""
