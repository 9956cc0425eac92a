module kube-migros.local/images

go 1.24
