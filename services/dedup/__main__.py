from services.common.service import main
from services.dedup.service import DedupService

raise SystemExit(main(DedupService))
