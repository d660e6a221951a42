"""samunetr: SAM-UNETR (Alzate-Grisales et al., IEEE Access 11:118217, 2023): a SAM ViT encoder feeding a UNETR
decoder, trained on 2D slices. plan.py is the section and its input-size rule; network.py the torch parts."""
