from services.common.service import main
from services.crawler.service import CrawlerService

raise SystemExit(main(CrawlerService))
