"""Evaluation of synthetic volumes (DESIGN.md section 7): copy detection before sharing,
quality metrics and self-contained reports.

datasets      the folders evaluation reads (sample output, images/ + masks/, ACDC), lazily
encoder       the self-supervised NT-Xent copy-detection encoder (train, resume, embed, save, load, cache)
memorization  the copy screen: encoder and image signals, nearest neighbours by Pearson correlation, the
              threshold, copies and memorised volumes, --calibrate; nearest-neighbour realism
degrade       degraded copies (noise, blur, intensity, shift, deformation, temporal shift) for --calibrate
metrics       MS-SSIM diversity, FID, MMD, inter-slice and temporal statistics, EF, Dice (CT: by HU
              ranges), realism rows
features      MedicalNet / RadImageNet feature extractors from local weights
quality       all quality metrics of a synthetic set against a real one
energy        training and sampling energy, CO2 and driving distance for the reports
report        report.json and the self-contained report.html
share         the sharing gate behind `medgen share`
"""
